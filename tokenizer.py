"""
Text -> token ids, as CLIP does it: `[sot] + BPE(text) + [eot]`, cut to the context, zero-padded.

Two vocabularies, one layout:
- CLIP's own BPE file (`bpe_simple_vocab_16e6.txt.gz`, shipped with OpenCLIP): ids equal to
  OpenCLIP's tokenizer;
- a byte-level BPE learnt here from the training captions (the default when no --tokenizer is
  given), small enough for the `tiny` preset, with the same clean-up, pre-split and `</w>` word
  endings.

Either one is also written and read as Hugging Face's CLIPTokenizer files (vocab.json, merges.txt),
which transformers and OpenCLIP's HFTokenizer load (export.py).

Captions are cleaned as OpenCLIP's default tokenizer cleans them (`clean_caption`) before the BPE
sees them.

    tok = load_tokenizer("bpe_simple_vocab_16e6.txt.gz")  # 49408 ids, context 77
    tok(["a photo of a dog."])  # (1, 77) LongTensor; eot is the largest id
    tok = train_tokenizer(captions, vocab_size=1024, context_length=32)
    load_tokenizer(tok.to_json())  # a tokenizer is saved in a checkpoint as its JSON
    hf_tokenizer_files(tok)  # {"vocab.json": ..., "merges.txt": ..., "tokenizer_config.json": ...}
"""

import gzip
import html
import json
import os

# its threads and our forked dataloader workers don't mix
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ftfy
import torch
from tokenizers import Regex, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

SOT, EOT, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
# OpenAI CLIP reads only the first 48894 merges of its BPE file: 49408 tokens in all
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 512 + CLIP_NUM_MERGES + 2  # byte tokens, the same with </w>, merges, sot and eot
# CLIP's pre-split: contractions, runs of letters, single digits, runs of other non-space
# characters; spaces vanish. Case-insensitive as CLIP's: on lower-cased text that still matters for
# the long s, "dog'ſ" -> "dog", "'ſ".
CLIP_SPLIT = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# upper bound for a tokenizer trained by load_tokenizer(captions): CLIP's size
TRAINED_VOCAB_SIZE = 49408


def clean_caption(text):
    """OpenCLIP's default clean-up, in its order. ftfy repairs what web captions are full of
    (mojibake "cafÃ©" -> "café", curly quotes -> straight, full-width "ＡＢＣ" -> "ABC",
    ligature "ﬁ" -> "fi", control characters dropped) and ends in NFC; HTML entities are unescaped
    twice (captions are often escaped twice: "&amp;amp;"); whitespace runs become one space; then
    lower case (Python's, which knows a word-final sigma: "ΟΔΟΣ" -> "οδος")."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def byte_alphabet():
    """byte -> printable character (GPT-2's byte-level map), in CLIP's vocabulary order: printable
    Latin-1 first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """list of strings -> (B, context_length) LongTensor: [sot] + BPE(text) + [eot], cut to the
    context (still ending with eot), zero-padded. eot is the largest id, because the text tower
    pools at tokens.argmax(-1) as CLIP does.

    Captions go through `clean_caption` (Python: ftfy and HTML unescaping have no `tokenizers`
    equivalent), then a HuggingFace `tokenizers.Tokenizer` does CLIP's pre-split and byte-level BPE
    with `</w>` ending each word, and the length rule. The HF tokenizer has no normalizer:
    clean_caption does all the clean-up, once (`tokenizers`' own Lowercase is per character and
    misses the word-final sigma that Python's lower() gets right)."""

    def __init__(self, hf, context_length=None):
        vocab = hf.get_vocab()
        if SOT not in vocab or EOT not in vocab:
            raise ValueError(f"tokenizer has no {SOT} / {EOT} tokens; CLIP-style tokenizers "
                             "need both")
        self.sot, self.eot, self.vocab_size = vocab[SOT], vocab[EOT], max(vocab.values()) + 1
        if self.eot != self.vocab_size - 1:
            raise ValueError(f"{EOT} must have the largest id ({self.vocab_size - 1}), "
                             f"has {self.eot}")
        self.context_length = context_length or (hf.truncation or {}).get("max_length", 77)
        special_tokens = [(SOT, self.sot), (EOT, self.eot)]
        hf.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                          special_tokens=special_tokens)
        # counts sot and eot: text keeps context_length - 2 tokens
        hf.enable_truncation(self.context_length)
        hf.enable_padding(length=self.context_length, pad_id=0, pad_token=hf.id_to_token(0))
        hf.normalizer = None  # a tokenizer.json may carry one; clean_caption is the clean-up
        self.hf = hf

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        ids = [e.ids for e in self.hf.encode_batch([clean_caption(t) for t in texts])]
        return torch.tensor(ids, dtype=torch.long).view(len(texts), self.context_length)

    def decode(self, ids):
        """Token ids -> the cleaned text, read between sot and the first eot (CLIP's decode)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot:
            ids = ids[1:ids.index(self.eot)] if self.eot in ids else ids[1:]
        byte_of = {c: b for b, c in byte_alphabet().items()}
        text = "".join(self.hf.id_to_token(i) for i in ids)
        text = bytes(byte_of[c] for c in text).decode("utf-8", "replace")
        return text.replace("</w>", " ").strip()

    def to_json(self):
        return self.hf.to_str()


def trim_padding(tokens):
    """(B, T) token ids -> (B, T'): the first T' positions, T' the longest caption's (up to its
    end-of-text token, the largest id). The text tower is causal, so no token after a caption's
    end-of-text token changes its features or their gradients: the trimmed batch encodes to the
    same features with less work (the built-in captions fill at most 11 of the tiny preset's 32
    positions). For token ids on the host, before the copy to the device: no host-device sync."""
    longest = int(tokens.argmax(dim=-1).max()) + 1
    return tokens if longest == tokens.shape[1] else tokens[:, :longest]


def bpe_tokenizer(merges, pad=False):
    """HF tokenizer with CLIP's layout: ids = [<pad>] + 256 byte characters + the same with </w> +
    one token per merge + [sot, eot]. CLIP has no pad token (it pads with 0, the id of "!"); a
    tokenizer trained here reserves 0 for it."""
    chars = list(byte_alphabet().values())
    ids = {}
    tokens = [PAD] * pad + chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    for token in tokens + [SOT, EOT]:
        # a learnt merge can rebuild an existing token: keep the first id
        ids.setdefault(token, len(ids))
    bpe = models.BPE(ids, [tuple(m) for m in merges], end_of_word_suffix="</w>", fuse_unk=False)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        # keep the matches, drop the rest
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        # bytes -> printable characters
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.add_special_tokens([SOT, EOT])
    return hf


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def clip_bpe_merges(path):
    """The merges of a CLIP BPE vocabulary file (`bpe_simple_vocab_16e6.txt.gz`: a header line, then
    "a b" per line)."""
    lines = read_text(path).split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1] if line.strip()]


def is_clip_bpe(tok):
    """Whether `tok` is CLIP's own BPE (bpe_simple_vocab_16e6), whose ids OpenCLIP's default
    tokenizer gives: CLIP's layout (no pad token) and its 49,408 ids."""
    return PAD not in tok.hf.get_vocab() and tok.vocab_size == CLIP_VOCAB_SIZE


def hf_tokenizer_files(tok):
    """{file name: text} of Hugging Face's CLIPTokenizer format for `tok`: vocab.json, merges.txt
    and tokenizer_config.json (the special tokens and the context). transformers' CLIPTokenizer
    builds from them the same pre-split, bytes and `</w>`, so its ids are ours on a cleaned
    caption (its own clean-up is NFC, whitespace and lower case, without ftfy or HTML
    unescaping); OpenCLIP's HFTokenizer(folder, clean="lower") cleans as clean_caption first.
    CLIP's BPE pads with eot there, as transformers' CLIP tokenizers do; the text tower is causal,
    so what follows eot is never read."""
    bpe = json.loads(tok.to_json())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]  # by version
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": SOT, "eos_token": EOT,
              "unk_token": EOT, "pad_token": PAD if PAD in bpe["vocab"] else EOT,
              "model_max_length": tok.context_length}
    return {"vocab.json": json.dumps(bpe["vocab"], ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
            "tokenizer_config.json": json.dumps(config, indent=1)}


def read_hf_tokenizer(folder, context_length=None):
    """A Tokenizer from CLIPTokenizer files (vocab.json, merges.txt: hf_tokenizer_files', or those
    published with CLIP models on the Hugging Face Hub). The ids are rebuilt from the merges in
    CLIP's layout and must be vocab.json's. context_length: default tokenizer_config.json's
    model_max_length, else 77."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    lines = read_text(os.path.join(folder, "merges.txt")).split("\n")
    lines = lines[1:] if lines[0].startswith("#version") else lines  # the header line
    merges = [tuple(line.split()) for line in lines if line.strip()]
    hf = bpe_tokenizer(merges, pad=PAD in vocab)
    if hf.get_vocab() != vocab:
        raise ValueError(f"{folder}: vocab.json is not the vocabulary its merges.txt gives in "
                         "CLIP's layout (byte tokens, the same with </w>, merges, sot, eot)")
    config_path, max_length = os.path.join(folder, "tokenizer_config.json"), None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            max_length = json.load(f).get("model_max_length")
    if not isinstance(max_length, int) or max_length >= 10**6:  # transformers' int(1e30): no limit
        max_length = 77
    return Tokenizer(hf, context_length or max_length)


def train_tokenizer(captions, vocab_size=1024, context_length=77):
    """A BPE tokenizer learnt from captions (clean_caption, CLIP's pre-split, bytes, `</w>`), laid
    out like CLIP's: pad = 0, the 512 byte characters, up to vocab_size - 515 merges, then sot =
    vocab_size - 2, eot = vocab_size - 1. A small corpus may run out of merges first: the vocabulary
    is then smaller, and eot is still the largest id."""
    num_merges = vocab_size - 1 - 512 - 2
    if num_merges < 0:
        raise ValueError("vocab_size must be at least 515 (pad, 512 byte tokens, sot, eot), "
                         f"got {vocab_size}")
    # same pre-split as the final tokenizer, learning on the same cleaned text
    learner = bpe_tokenizer([])
    trainer = trainers.BpeTrainer(vocab_size=512 + num_merges, show_progress=False,
                                  end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learner.train_from_iterator((clean_caption(c) for c in captions), trainer)
    merges = json.loads(learner.to_str())["model"]["merges"][:num_merges]
    # format differs by version
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return Tokenizer(bpe_tokenizer(merges, pad=True), context_length)


def load_tokenizer(spec, context_length=None):
    """A Tokenizer from: a CLIP BPE file (`bpe_simple_vocab_16e6.txt.gz`, ids as OpenCLIP's), a
    `tokenizer.json` or its text (`Tokenizer.to_json()`), a folder of CLIPTokenizer files
    (vocab.json + merges.txt), or a captions file / folder of .txt files to train one on (one
    caption per line). context_length: default 77, or the one stored in a tokenizer.json or
    tokenizer_config.json."""
    if isinstance(spec, Tokenizer):
        spec = spec.to_json()
    spec = str(spec)
    if spec.lstrip().startswith("{"):
        return Tokenizer(HFTokenizer.from_str(spec), context_length)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer {spec}: no such file or directory")
    if os.path.isfile(spec) and spec.endswith(".json"):
        return Tokenizer(HFTokenizer.from_file(spec), context_length)
    if all(os.path.isfile(os.path.join(spec, f)) for f in ("vocab.json", "merges.txt")):
        return read_hf_tokenizer(spec, context_length)
    files = [spec] if os.path.isfile(spec) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(".txt"))
    texts = [read_text(path) for path in files]
    if os.path.isfile(spec) and (spec.endswith(".gz") or texts[0].startswith("#version")):
        return Tokenizer(bpe_tokenizer(clip_bpe_merges(spec)), context_length or 77)
    captions = [line for text in texts for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"tokenizer {spec}: no captions to train a tokenizer on")
    return train_tokenizer(captions, TRAINED_VOCAB_SIZE, context_length or 77)
