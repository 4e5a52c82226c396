"""Write a tiny random-weight llama-architecture GGUF model for tests (about 0.5 MB).

The model is nonsense but real: llama.cpp's llama-server loads it in well under a second and
serves chat, completions and streaming with deterministic output at temperature 0.

Usage: python scripts/tiny_gguf.py OUT.gguf [--seed N]
"""

from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter, LlamaFileType, TokenType

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX_TRAIN = 2048

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Whole-word tokens, so generated text looks like (random) words.
WORDS_TEXT = """
the of and to in is it you that he was for on are with as I his they be at one have
this from or had by hot word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come
"""

# ChatML; <|im_start|> and <|im_end|> are control tokens of the vocabulary.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vocab() -> tuple[list[str], list[float], list[TokenType]]:
    """SPM vocabulary: specials, all 256 byte tokens, printable ASCII, then whole words."""
    tokens = list(SPECIAL_TOKENS)
    types = [TokenType.UNKNOWN] + [TokenType.CONTROL] * (len(SPECIAL_TOKENS) - 1)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    normal = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)] + ["\u2581" + w for w in WORDS_TEXT.split()]
    tokens += normal
    types += [TokenType.NORMAL] * len(normal)
    scores = [0.0] * (len(tokens) - len(normal)) + [-float(i) for i in range(len(normal))]
    return tokens, scores, types


def _tensors(rng: np.random.Generator, types: list[TokenType]) -> dict[str, npt.NDArray[np.float32]]:
    """llama tensors, numpy shape (out, in); weights scaled so activations stay O(1)."""

    def mat(n_out: int, n_in: int, scale: float = 1.0) -> npt.NDArray[np.float32]:
        m = rng.standard_normal((n_out, n_in), dtype=np.float32)
        m *= scale / math.sqrt(n_in)
        return m

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    n_vocab = len(types)
    n_embd_kv = N_EMBD // N_HEAD * N_HEAD_KV
    out: dict[str, npt.NDArray[np.float32]] = {
        "token_embd.weight": rng.standard_normal((n_vocab, N_EMBD), dtype=np.float32),
    }
    for i in range(N_LAYER):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = ones(N_EMBD)
        out[p + "attn_q.weight"] = mat(N_EMBD, N_EMBD)
        out[p + "attn_k.weight"] = mat(n_embd_kv, N_EMBD)
        out[p + "attn_v.weight"] = mat(n_embd_kv, N_EMBD)
        out[p + "attn_output.weight"] = mat(N_EMBD, N_EMBD)
        out[p + "ffn_norm.weight"] = ones(N_EMBD)
        out[p + "ffn_gate.weight"] = mat(N_FF, N_EMBD)
        out[p + "ffn_up.weight"] = mat(N_FF, N_EMBD)
        out[p + "ffn_down.weight"] = mat(N_EMBD, N_FF)
    out["output_norm.weight"] = ones(N_EMBD)
    # Logits of normal tokens have a standard deviation of about 4, so their maximum is far
    # above 0. Only normal tokens get output weights: byte and control tokens score exactly 0,
    # so they are never chosen at temperature 0 and are cut by the default top-k/min-p when
    # sampling. Output is printable, and generation always runs to max_tokens.
    output = mat(n_vocab, N_EMBD, scale=4.0)
    output[[t != TokenType.NORMAL for t in types]] = 0.0
    out["output.weight"] = output
    return out


def write_tiny_model(path: pathlib.Path, seed: int = 0) -> None:
    """Write the tiny model to path; the same seed always gives the same bytes."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    w = GGUFWriter(path, arch="llama")
    w.add_name("tiny-random-llama")
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in _tensors(rng, types).items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight llama GGUF model.")
    parser.add_argument("output", type=pathlib.Path, help="path of the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    output: pathlib.Path = args.output
    seed: int = args.seed
    output.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_model(output, seed)
    print(f"{output}: {output.stat().st_size} bytes")


if __name__ == "__main__":
    main()
