"""`python -m pipeserve`: start the front process (see cli.main)."""

if __name__ == "__main__":
    # Imported here, not at module level: a spawned model process re-imports the parent's
    # __main__ module and must not pay for (or start) the front.
    from pipeserve.front.cli import main

    raise SystemExit(main())
