"""The command that trains a data set's feature network (utils/evaluation/features.py) from a config:

    python -m utils.inference.features -c configs/mnist.yaml [--data_root DIR] [--steps N] [--seed S] [--out FILE]

It reads the training split, trains, and only then reads the held-out split, for a classifier's accuracy
(printed and kept in the file; it has no part in the training).
"""

from __future__ import annotations

import time
from pathlib import Path

from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation import features
from utils.evaluation.features import DEFAULT_STEPS


def main(argv: list[str] | None = None) -> None:
    from utils.config import load_config
    from utils.data.registry import load_data
    from utils.evaluation import feature_training as ft

    p = CliParser(prog="utils.inference.features", description="Train the feature network of a data set "
                  "(its training split only), the feature space of the sample-quality metrics.")
    p.add_argument("-c", "--config", required=True, help="a run's config or any config naming the data set")
    p.add_argument("--data_root", help="data.root (default: the config's)")
    p.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where to write it (default features/<data set>.safetensors)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: give a positive number of training steps")
    cfg = load_config(args.config, [f"data.root={args.data_root}"] if args.data_root else [])
    out = Path(args.out or Path("features") / f"{cfg.data.name}.safetensors")
    train, test, summary = load_data(cfg.data)
    print(summary)
    start = time.perf_counter()
    net, meta = features.train_feature_net(train, cfg.data.name, args.steps, args.seed)
    seconds = time.perf_counter() - start
    if meta["config"]["kind"] == "classifier" and ft.labelled(test):
        meta["report"]["held_out_accuracy"] = ft.accuracy(net, test)  # read after training, for this report only
    identity = features.save_feature_net(net, meta, out)
    numbers = "  ".join(f"{k} {v:.4g}" for k, v in meta["report"].items())
    print(f"trained in {seconds:.1f} s: {numbers}")
    print(f"wrote {out} ({identity})")


if __name__ == "__main__":
    guarded_main(main)
