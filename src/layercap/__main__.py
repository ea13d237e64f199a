from layercap.cli import main

if __name__ == "__main__":  # `python -m layercap ...` (also what torchrun runs)
    raise SystemExit(main())
