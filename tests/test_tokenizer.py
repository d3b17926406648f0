"""The contract of tokenizer.py: CLIP's layout (sot, BPE, eot as the largest id, zero padding), ids
equal to CLIP's tokenizer from its vocabulary file, captions cleaned as OpenCLIP cleans them
(mojibake, curly quotes, full-width letters, ligatures, HTML entities, whitespace), and a BPE
trained on captions that saves and loads as JSON."""

import gzip
import html
import math
import re
import unicodedata

import ftfy
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

from tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"sample {i}" for i in range(200)] + ["a photo of a red star"], 600, 16)


def test_trained_tokenizer_layout_padding_truncation_and_round_trip(tok, tmp_path):
    assert tok.context_length == 16
    assert tok.eot == tok.vocab_size - 1 and tok.sot == tok.vocab_size - 2
    # eot is the largest id: the text tower pools at argmax
    assert max(tok.hf.get_vocab().values()) == tok.eot
    short, long = tok(["A photo of   a RED star", " ".join(["star"] * 40)])
    n = int((short != 0).sum())
    assert short[0] == tok.sot and short[n - 1] == tok.eot
    assert (short[n:] == 0).all() and (short[1:n - 1] != 0).all()
    # cut to 16, still ends with eot
    assert long[0] == tok.sot and long[-1] == tok.eot and (long != 0).all()
    assert tok.decode(short) == "a photo of a red star"  # lower-cased, whitespace cleaned
    wide = load_tokenizer(tok.to_json(), context_length=64)
    text = "naïve café 日本 &amp; 42!"
    # unseen characters go as bytes: none lost
    assert tok.decode(wide([text])[0]) == "naïve café 日本 & 4 2 !"
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
    assert t(["a red star"]).shape == (1, 8)
    assert int((t(["a red star"]) != 0).sum()) == 5  # sot a red star eot


def reference_byte_map():
    """GPT-2 / CLIP: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256),
    chr(257), ..."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    return dict(zip(keep + rest, [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]))


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clip_words(text):
    """CLIP's pre-split of cleaned text: at each place, a contraction (any case), else a run of
    letters (L*), one number character (N*: digits, "½", "Ⅷ"), or a run of other non-space
    characters; spaces separate and vanish."""
    def kind(c):
        categories = {"L": "letter", "N": "number"}
        return "space" if c.isspace() else categories.get(unicodedata.category(c)[0], "other")
    words, i = [], 0
    while i < len(text):
        contraction = next((c for c in CONTRACTIONS if text[i:i + len(c)].casefold() == c),
                           None)  # "'ſ" too
        j = i + len(contraction) if contraction else i + 1
        while (not contraction and kind(text[i]) != "number" and j < len(text)
               and kind(text[j]) == kind(text[i])):
            j += 1  # letters, spaces and other characters come in runs, numbers one at a time
        if kind(text[i]) != "space":
            words.append(text[i:j])
        i = j
    return words


class ReferenceCLIPBPE:
    """CLIP's tokenizer written from its description: clean (ftfy's repairs, HTML unescaped twice,
    whitespace runs to one space, lower case), pre-split (clip_words), bytes -> characters, then
    merge the best-ranked adjacent pair until none is left, with `</w>` marking the end of each
    word."""

    def __init__(self, merges):
        chars = list(reference_byte_map().values())
        vocab = (chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
                 + ["<|startoftext|>", "<|endoftext|>"])
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, word):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(pair, math.inf), pair)
                             for pair in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            parts = apply_merge(parts, pair)
        return parts

    def encode(self, text, context_length=77):
        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        words = clip_words(text)
        byte_map = reference_byte_map()
        ids = [self.ids[t] for w in words
               for t in self.bpe("".join(byte_map[b] for b in w.encode()))]
        sot, eot = self.ids["<|startoftext|>"], self.ids["<|endoftext|>"]
        ids = ([sot] + ids)[: context_length - 1] + [eot]
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
    """A tiny BPE learner (most frequent adjacent pair first) to make a vocabulary file in CLIP's
    format."""
    byte_map = reference_byte_map()
    words = [list("".join(byte_map[b] for b in w.encode()))
             for w in re.findall(r"[^\W\d_]+", corpus.lower())]
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


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    """A small vocabulary file in CLIP's format (merges learnt from a few sentences) and its
    merges."""
    corpus = ("a photo of the cat sitting on a mat there is a dog and another dog in the "
              "photograph the weather is rather hot at the theatre these photos of cats and dogs "
              "were taken at night café crème été fish flow star abc tom jerry οδος") * 3
    merges = learn_merges(corpus, 100)
    path = tmp_path_factory.mktemp("clip") / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(path), merges


def test_clip_bpe_file_gives_the_ids_of_clips_tokenizer(clip_vocab):
    path, merges = clip_vocab
    tok, ref = load_tokenizer(path), ReferenceCLIPBPE(merges)
    assert tok.vocab_size == 512 + len(merges) + 2 and tok.eot == tok.vocab_size - 1
    assert tok.context_length == 77
    texts = ["A photo of the cat.", "  there's   a DOG's photograph, at night!!",
             "the theatre's 2024 photos: cats & dogs",
             "Rather hot weather &amp; 3 mats", "unseen wordsxyz don't panic",
             "a photo of the cat " * 20]
    assert tok(texts).tolist() == [ref.encode(t) for t in texts]


# What web captions are full of. Mojibake is UTF-8 read as Windows-1252 ("cafÃ©"); "&amp;amp;" is
# escaped twice.
MESSY_CAPTIONS = [
    "cafÃ© crÃ¨me on a mat", "the cat donâ€™t sit",
    "“A dog” on ‘the’ mat «photo»", "ＡＢＣ ｃａｔ ！ １２", "ﬁsh ﬂow ﬀ",
    "Tom &amp;amp; Jerry&#39;s &lt;b&gt;", "<b>bold &amp;amp; tag</b>", "ΟΔΟΣ",
    "İstanbul night", "emoji 😀🎉👍🏽 photo", "東京タワー 北京の猫", "مرحبا",
    "naïve e\u0301te\u0301 A\u030a", "the dog'ſ mat", "a\u00a0dog\t on\n\r\na\u3000mat ",
    "a\x07cat\x00 \x1b[31mred\x1b[0m", "½ cup ² Ⅷ", "\ufeffbom", "", "   ",
    # ftfy leaves entities alone beside a tag: these curly quotes come after it, and stay
    "<i>&#8220;Quoted&#8221;</i>",
    "“Cafés” &amp; ＤＯＧＳ’ ﬁsh " * 12,
]


def test_clip_bpe_cleans_messy_captions_as_clip(clip_vocab):
    path, merges = clip_vocab
    tok, ref = load_tokenizer(path), ReferenceCLIPBPE(merges)
    ids = tok(MESSY_CAPTIONS)
    assert ids.tolist() == [ref.encode(t) for t in MESSY_CAPTIONS]
    # the long one is cut to 77, ending in eot
    assert ids[-1, -1] == tok.eot and (ids[-1] != 0).all()


# (messy, what OpenCLIP's clean-up makes of it): each pair must give the same ids
CLEANED = [
    ("cafÃ© crÃ¨me", "café crème"),  # mojibake repaired
    ("donâ€™t", "don't"),  # mojibake of a curly apostrophe
    ("“a dog” ‘on’ a mat", "\"a dog\" 'on' a mat"),  # curly quotes straightened
    ("ＡＢＣ ｄｏｇ", "abc dog"),  # full-width letters
    ("ﬁsh ﬂow", "fish flow"),  # ligatures
    ("Tom &amp;amp; Jerry&#39;s", "tom & jerry's"),  # entities, escaped twice
    ("ΟΔΟΣ", "οδος"),  # lower case with a word-final sigma
    ("a\u00a0cat\t on\n\r\na  mat ", "a cat on a mat"),  # whitespace runs -> one space
    ("a\x07star\x00", "astar"),  # control characters dropped, not made spaces
    ("e\u0301te\u0301", "été"),  # NFC
]


@pytest.mark.parametrize("kind", ["clip_vocab", "trained"])
def test_captions_are_cleaned_as_openclip_cleans_them(kind, clip_vocab, tok):
    tok = load_tokenizer(clip_vocab[0]) if kind == "clip_vocab" else tok
    for messy, clean in CLEANED:
        assert tok([messy]).tolist() == tok([clean]).tolist(), messy
    # the ids say something
    assert len({tuple(tok([clean])[0].tolist()) for _, clean in CLEANED}) == len(CLEANED)


def test_trained_tokenizer_learns_on_cleaned_captions():
    messy = "cafÃ© ＳＴＡＲ ﬁsh &amp;amp; “dogs”"
    tok = train_tokenizer([messy] * 50, 600, 16)
    ids = tok(["café star fish & \"dogs\""])[0]
    # sot, one learnt token per word (café star fish & " dogs "), eot
    assert int((ids != 0).sum()) == 2 + 7
    assert tok.decode(ids) == 'café star fish & " dogs "' and torch.equal(tok([messy])[0], ids)


def test_a_normalizer_in_a_tokenizer_json_is_not_applied(tok):
    hf = HFTokenizer.from_str(tok.to_json())
    # common in tokenizer.json files; it would turn "½" into "1⁄2"
    hf.normalizer = normalizers.NFKC()
    loaded = load_tokenizer(hf.to_str())
    assert loaded(["½ cup"]).tolist() == tok(["½ cup"]).tolist() != tok(["1⁄2 cup"]).tolist()


def test_clip_bpe_file_is_cut_at_clips_48894_merges(tmp_path):
    chars = list(reference_byte_map().values())[:94]  # printable ASCII
    pairs = [(a, b) for a in chars for b in chars]
    merges = (pairs + [(a, b + "</w>") for a, b in pairs]
              + [(a + b, c) for a, b in pairs for c in chars])
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
