"""`python -m sinkscope ...` (and `torchrun ... -m sinkscope ...`): the `sinkscope` command."""

from sinkscope.cli import main

if __name__ == "__main__":
    main()
