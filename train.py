"""Train a continual method on a benchmark: ``python train.py method=ewc benchmark=permuted_mnist key=value``.

See ``configs/train.yaml`` for the defaults and README.md for the override syntax.
"""

import sys

if __name__ == "__main__":
    from cl_lightning import usage  # --help needs neither torch nor Lightning: answered before importing them

    if usage.wants_help(sys.argv[1:]):
        sys.exit(usage.main(sys.argv[1:]))
    from cl_lightning.experiment import main

    sys.exit(main())
