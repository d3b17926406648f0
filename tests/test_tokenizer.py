"""The contract of tokenizer.py: CLIP's layout (sot, BPE, eot as the largest id, zero padding), ids equal to CLIP's
tokenizer from its vocabulary file, and a BPE trained on captions that saves and loads as JSON."""

import gzip
import math
import re

import pytest
import torch

from tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"sample {i}" for i in range(200)] + ["a photo of a red star"], 600, 16)


def test_trained_tokenizer_layout_padding_truncation_and_round_trip(tok, tmp_path):
    assert tok.context_length == 16 and tok.eot == tok.vocab_size - 1 and tok.sot == tok.vocab_size - 2
    assert max(tok.hf.get_vocab().values()) == tok.eot  # eot is the largest id: the text tower pools at argmax
    short, long = tok(["A photo of   a RED star", " ".join(["star"] * 40)])
    n = int((short != 0).sum())
    assert short[0] == tok.sot and short[n - 1] == tok.eot and (short[n:] == 0).all() and (short[1:n - 1] != 0).all()
    assert long[0] == tok.sot and long[-1] == tok.eot and (long != 0).all()  # cut to 16, still ends with eot
    assert tok.decode(short) == "a photo of a red star"  # lower-cased, whitespace cleaned
    wide = load_tokenizer(tok.to_json(), context_length=64)
    text = "naïve café 日本 &amp; 42!"
    assert tok.decode(wide([text])[0]) == "naïve café 日本 & 4 2 !"  # unseen characters go as bytes: none lost
    again = load_tokenizer(tok.to_json())
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    from_file = load_tokenizer(str(tmp_path / "tokenizer.json"))
    texts = ["sample 3", "a photo of a red star", "something else entirely"]
    assert again.context_length == from_file.context_length == 16
    assert torch.equal(again(texts), tok(texts)) and torch.equal(from_file(texts), tok(texts))


def test_tokenizer_from_a_captions_file(tmp_path):
    (tmp_path / "captions.txt").write_text("a red star\na blue circle\n" * 20)
    t = load_tokenizer(str(tmp_path / "captions.txt"), context_length=8)
    assert t.decode(t(["a red circle"])[0]) == "a red circle" and t.eot == t.vocab_size - 1
    assert t(["a red star"]).shape == (1, 8) and int((t(["a red star"]) != 0).sum()) == 5  # sot a red star eot


def reference_byte_map():
    """GPT-2 / CLIP: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256), chr(257), ..."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    return dict(zip(keep + rest, [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]))


class ReferenceCLIPBPE:
    """CLIP's tokenizer written from its description: clean (html unescape, whitespace, lower case), pre-split into
    contractions / letter runs / single digits / other runs, bytes -> characters, then merge the best-ranked adjacent
    pair until none is left, with `</w>` marking the end of each word."""

    def __init__(self, merges):
        chars = list(reference_byte_map().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                       "<|endoftext|>"]
        self.ids, self.ranks = {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(self, word):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(pair, math.inf), pair) for pair in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            parts = apply_merge(parts, pair)
        return parts

    def encode(self, text, context_length=77):
        import html
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        words = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", text)
        byte_map = reference_byte_map()
        ids = [self.ids[t] for w in words for t in self.bpe("".join(byte_map[b] for b in w.encode()))]
        ids = ([self.ids["<|startoftext|>"]] + ids)[: context_length - 1] + [self.ids["<|endoftext|>"]]
        return ids + [0] * (context_length - len(ids))


def apply_merge(parts, pair):
    """Merge every occurrence of `pair` in `parts`, left to right."""
    out, i = [], 0
    while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def learn_merges(corpus, n):
    """A tiny BPE learner (most frequent adjacent pair first) to make a vocabulary file in CLIP's format."""
    byte_map = reference_byte_map()
    words = [list("".join(byte_map[b] for b in w.encode())) for w in re.findall(r"[^\W\d_]+", corpus.lower())]
    words = [w[:-1] + [w[-1] + "</w>"] for w in words]
    merges = []
    for _ in range(n):
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        words = [apply_merge(w, best) for w in words]
    return merges


def test_clip_bpe_file_gives_the_ids_of_clips_tokenizer(tmp_path):
    corpus = ("a photo of the cat sitting on a mat there is a dog and another dog in the photograph "
              "the weather is rather hot at the theatre these photos of cats and dogs were taken at night") * 3
    merges = learn_merges(corpus, 60)
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok, ref = load_tokenizer(str(path)), ReferenceCLIPBPE(merges)
    assert tok.vocab_size == 512 + len(merges) + 2 and tok.eot == tok.vocab_size - 1 and tok.context_length == 77
    texts = ["A photo of the cat.", "  there's   a DOG's photograph, at night!!",
             "the theatre's 2024 photos: cats & dogs",
             "Rather hot weather &amp; 3 mats", "unseen wordsxyz don't panic", "a photo of the cat " * 20]
    assert tok(texts).tolist() == [ref.encode(t) for t in texts]


def test_clip_bpe_file_is_cut_at_clips_48894_merges(tmp_path):
    chars = list(reference_byte_map().values())[:94]  # printable ASCII
    pairs = [(a, b) for a in chars for b in chars]
    merges = pairs + [(a, b + "</w>") for a, b in pairs] + [(a + b, c) for a, b in pairs for c in chars]
    path = tmp_path / "big_vocab.txt"
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges[:49_000]))
    tok = load_tokenizer(str(path), context_length=8)
    assert tok.vocab_size == 49408 and (tok.sot, tok.eot) == (49406, 49407)  # 256 + 256 + 48894 + 2
    hi = 512 + len(pairs) + pairs.index(("h", "i"))  # "hi" is one word: the merge (h, i</w>)
    assert tok(["hi"])[0].tolist() == [49406, hi, 49407] + [0] * 5


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="at least 515"):
        train_tokenizer(["a b"], vocab_size=100)
