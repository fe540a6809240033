"""qblora_pl command line: ``python main.py fit --config configs/qablora.yaml``.

Subcommands: fit, validate, test, predict (LightningCLI); ``--help`` and ``--print_config``
list every option.
"""

from qblora_pl.cli import main

if __name__ == "__main__":
    main()
