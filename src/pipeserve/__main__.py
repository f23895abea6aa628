"""`python -m pipeserve`: start the front process (see cli.main)."""

if __name__ == "__main__":
    # Before anything heavy is imported: as a container's PID 1, a SIGTERM without a handler
    # would be dropped (front/early.py).
    from pipeserve.front import early

    early.install()
    # Imported here, not at module level: a spawned model process re-imports the parent's
    # __main__ module and must not pay for (or start) the front.
    from pipeserve.front.cli import main

    raise SystemExit(main())
