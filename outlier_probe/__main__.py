"""`python -m outlier_probe ...`: the same CLI as the `outlier-probe` console script."""

from outlier_probe.cli.main import main

if __name__ == "__main__":
    main()
