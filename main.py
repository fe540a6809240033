"""qblora_pl command line.

    python main.py fit --config configs/qablora.yaml        # LightningCLI: fit, validate, test, predict
    python main.py export --ckpt_path CKPT                   # merge a saved adapter into a low-bit model

``--help`` lists every option; ``--print_config`` prints the resolved configuration.
"""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from qblora_pl.export.cli import main as export_main

        export_main(sys.argv[2:])
    else:
        from qblora_pl.cli import main

        main()
