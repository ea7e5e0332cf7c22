"""The resident cluster master (host side, standard library only).

Entry point: deployer.master.cli.main(argv) -> exit code; `python -m deployer.master`.
"""
