"""Where does a misleading statement start to change the model's answer?

Compares "The capital of France is" with the same question after a false statement, reading the
probability of " Paris" through the logit lens at every layer, and prints where they diverge.

    .venv/bin/python examples/compare_prompts.py [--model PATH] [--threshold 0.1]
"""
from __future__ import annotations

import argparse

from explorer import CompareRequest, ModelSession, compare_prompts

CLEAN = "The capital of France is"
MISLEADING = "The capital of France is London. The capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args()

    session = ModelSession.load(args.model)
    comp = compare_prompts(session, CompareRequest(CLEAN, MISLEADING, target=" Paris"))
    clean, misled = comp.curves()
    print(f"p({comp.a.target!r}) at the last position, per layer")
    print(f"{'layer':>6} {'clean':>8} {'misled':>8}")
    for label, a, b in zip(comp.layer_labels, clean, misled):
        print(f"{label:>6} {a:8.4f} {b:8.4f}")
    row = comp.divergence_row(args.threshold)
    where = "never" if row is None else f"first at {comp.layer_labels[row]}"
    print(f"The curves diverge by more than {args.threshold}: {where}.")
    print(f"Final answer, clean: {str(comp.a.top_tokens[-1, -1, 0])!r} ({clean[-1]:.2f}); "
          f"misled: {str(comp.b.top_tokens[-1, -1, 0])!r} ({misled[-1]:.2f})")


if __name__ == "__main__":
    main()
