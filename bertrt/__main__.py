"""`python -m bertrt …`: the `bertrt` command."""

from bertrt.cli import main

if __name__ == "__main__":
    main()
