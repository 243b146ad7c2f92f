"""``python -m lowbit.cli ...``: the same as the ``lowbit`` command."""

from lowbit.cli import app

if __name__ == "__main__":
    app()
