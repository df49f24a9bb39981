"""`alibi-lm generate`: sample text from a checkpoint, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

NAME = "generate"
HELP = "sample text with the KV cache, streamed; goes past the training length"
ORDER = 60
DESCRIPTION = """\
Continue a prompt with a trained model, printing tokens as they come. Sampling: --temperature
(0 = greedy), --top-k, --top-p (nucleus), --seed. The KV cache makes each new token one forward
pass of one position; ALiBi models keep going past the length they were trained on.

Examples:
  alibi-lm generate runs/small --prompt "The history of" --max-new-tokens 200
  alibi-lm generate alibi-demo/runs/alibi --prompt "def " --temperature 0 --max-new-tokens 100
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: smallest set with probability p (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="stop at the tokenizer's end-of-line/end-of-text token (word and bpe tokenizers have one)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="bounded-error attention: the share of each row's softmax mass that may be left "
                             "out, e.g. 1e-4, so that each step reads only the cache the bias leaves alive (Triton "
                             "backend on CUDA; default: the model's attn_tolerance, 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")


class _Streamer:
    """Prints the text of the tokens so far as it grows. Decoding the whole continuation each time
    keeps multi-byte characters and BPE merges right; only text that no longer changes is printed."""

    def __init__(self, tokenizer, out=None, prompt: str = ""):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""
        self.out = out or sys.stdout
        self.prompt = prompt  # echoed with the first token, so that a refused request prints nothing
        # word tokens are joined by spaces, so the first one needs a space after a prompt that ends in a word
        self.separator = " " if tokenizer.kind == "word" and prompt and not prompt[-1].isspace() else ""

    def _echo_prompt(self) -> None:
        if self.prompt:
            self.out.write(self.prompt)
            self.out.flush()
            self.prompt = ""

    def __call__(self, tokens: list[int | None]) -> None:
        self._echo_prompt()
        if tokens[0] is None:
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        self._write_past_printed(stable)
        self.out.flush()

    def finish(self) -> None:
        self._echo_prompt()
        self._write_past_printed(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()

    def _write_past_printed(self, text: str) -> None:
        """Write what `text` adds to what is on the terminal (nothing if it no longer extends it)."""
        if text.startswith(self.printed) and len(text) > len(self.printed):
            if not self.printed and not text.startswith("\n"):
                self.out.write(self.separator)
            self.out.write(text[len(self.printed) :])
            self.printed = text


def run(args: argparse.Namespace) -> int:
    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.distributed import pick_device
    from alibi_lm.errors import UserError
    from alibi_lm.generate import generate
    from alibi_lm.model import set_attention_tolerance

    ckpt = load_checkpoint(args.checkpoint, device=pick_device(args.device))
    if args.tolerance is not None:
        set_attention_tolerance(ckpt.model, args.tolerance)
    if ckpt.tokenizer is None:
        raise UserError(f"{ckpt.path} has no tokenizer.json, so text cannot be encoded; copy the tokenizer.json "
                        "of its prepared data directory into it")
    if args.stop_at_eos and ckpt.tokenizer.eos_id is None:
        raise UserError(f"--stop-at-eos: the {ckpt.tokenizer.kind} tokenizer of {ckpt.path} has no end-of-text "
                        "token; leave the option out (generation stops after --max-new-tokens)")
    prompt = ckpt.tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("the prompt encodes to no tokens; give some text")
    streamer = _Streamer(ckpt.tokenizer, prompt=args.prompt)
    generate(ckpt.model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=streamer,
             stop_id=ckpt.tokenizer.eos_id if args.stop_at_eos else None)
    streamer.finish()
    return 0
