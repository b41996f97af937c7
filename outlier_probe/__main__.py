"""`python -m outlier_probe` (and `torchrun ... -m outlier_probe`): the outlier-probe command line."""

from outlier_probe.cli.main import main

if __name__ == "__main__":
    main()
