"""Recipe: unlearn a local Hugging Face model directory with SRMU, verify, save atomically.

    python python/unlearn_local_model.py --model path/to/model --forget forget.txt \
        --retain retain.txt --questions wmdp_bio.jsonl --out unlearned/

Without arguments it uses the embedded model and the entangled benchmark (files written to
a temporary directory), so it runs offline in under a minute on a CPU.
"""

import argparse
import tempfile
from pathlib import Path

from unlearn_kernels.data import entangled
from unlearn_kernels.data.loaders import read_multiple_choice, read_texts, write_jsonl
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.methods import SRMU
from unlearn_kernels.models import tiny
from unlearn_kernels.models.io import load_local, save_pretrained_atomic


def default_files(folder: Path) -> tuple[Path, Path, Path]:
    bench = entangled.generate(overlap=0.25)
    (folder / "forget.txt").write_text("\n".join(bench.corpus(bench.forget_facts())))
    (folder / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())))
    write_jsonl(folder / "forget_questions.jsonl", [q.to_json() for q in bench.questions(bench.forget_facts())])
    return folder / "forget.txt", folder / "retain.txt", folder / "forget_questions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(tiny.ASSET_DIR))
    parser.add_argument("--forget")
    parser.add_argument("--retain")
    parser.add_argument("--questions")
    parser.add_argument("--out", default="unlearned-srmu")
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    forget_file, retain_file, questions_file = (args.forget, args.retain, args.questions) if args.forget \
        else default_files(scratch)

    model, tokenizer = load_local(args.model)
    questions = read_multiple_choice(questions_file)
    before = accuracy(model, tokenizer, questions)
    method = SRMU(model, tokenizer, layer=args.layer, update=[f"layers.{{0,1,{args.layer}}}.mlp.*"], beta=4.0,
                  alpha=10.0, lr=5e-3, batch_size=16, steps=200, sparsity=0.25, anchor_forget=False)
    method.fit(read_texts(forget_file), read_texts(retain_file))
    after = accuracy(model, tokenizer, questions)
    print(f"forget-question accuracy: {before:.3f} -> {after:.3f}")
    report = {**method.report(), "metrics": {"forget_acc_before": before, "forget_acc_after": after}}
    print(f"saved to {save_pretrained_atomic(model, tokenizer, args.out, report)}")


if __name__ == "__main__":
    main()
