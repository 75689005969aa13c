"""`python -m broker.fake_provider`: the same as `isopool fake-provider`."""

from ..cli.commands import main

main(["fake-provider", *__import__("sys").argv[1:]], prog_name="isopool")
