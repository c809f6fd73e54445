"""Generate text from a trained run; see docs/generation.md.

    python generate.py --workdir runs/main/repaired --prompt "def main(" --max-new-tokens 200
    python generate.py --workdir runs/main/dense --prompt "import " --temperature 0.8 --top-p 0.95 --seed 1

Restores the run's saved config and its latest checkpoint (or --step), prefills the prompt's bytes through
the run's attention kernels and decodes one token at a time through bounded KV caches. Prints the prompt
followed by the generated text (bytes that are not UTF-8 print as U+FFFD).
"""

import argparse
import logging
import sys

from lm_experiment import fused_decode, generation
from lm_experiment.checkpointing import CorruptCheckpointError, restore_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="training workdir (config.json and checkpoints/)")
    p.add_argument("--prompt", required=True, help="text to continue (its UTF-8 bytes are the tokens)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--decode-impl", default="auto", choices=fused_decode.IMPLS,
                   help="the decoding step: XLA, the fused Triton kernels (GPU), or auto: the fused ones on a GPU "
                        "up to batch 4 (docs/generation.md)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        sampling = generation.Sampling(temperature=args.temperature, top_p=args.top_p)
        prompt = list(args.prompt.encode("utf-8"))
        if not prompt:
            raise ValueError("prompt: must hold at least one character")
        model, config, step = restore_model(args.workdir, args.step)
        tokens = generation.generate(model, [prompt], args.max_new_tokens, sampling=sampling, seed=args.seed,
                                     trained_seq_len=config.train.seq_len, impl=args.decode_impl)
    except (ValueError, CorruptCheckpointError) as error:
        print(f"generate.py: {error}", file=sys.stderr)
        return 1
    print(args.prompt + bytes(int(t) for t in tokens[0]).decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
