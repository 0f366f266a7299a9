"""lm-eval's own command line with the ``selfmoe`` model registered.

The stock ``lm_eval`` command cannot see models registered by other packages, so this entry
point imports the registration and hands over to lm-eval unchanged::

    python -m evaluation.cli run --model selfmoe --model_args target=mixse,model=tiny \\
        --tasks smoke_mc --include_path evaluation/tasks --device cpu
"""

from __future__ import annotations

import evaluation.lm  # noqa: F401  (registers the `selfmoe` model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
