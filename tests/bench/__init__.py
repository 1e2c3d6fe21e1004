"""`make bench`: speed and memory figures against the tools a user would otherwise run.

Never timed assertions: each section measures, prints a table and hands its
figures to run.py, which also writes them as JSON.
"""
