"""The contract between the controller and the hosts, in one place.

Both sides import this package and nothing else of each other: the host layout
(every path under deploy_to, release names), the table of master options, the
argv of agent calls and the typed answers they return, and the exit codes.
Standard library only and Python 3.9+, like everything shipped in the zipapp.
"""
