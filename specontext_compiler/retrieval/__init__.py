"""The retrieval head (the paper's algorithm level): scores every context token once per decode step.

Empty until the retrieval issue lands; nothing imports it yet.
"""
