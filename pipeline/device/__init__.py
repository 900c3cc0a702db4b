"""Devices this machine is not: named profiles, and running on their kernels under emulation."""
