"""Instruments that show why a network trains as it does: gradient flow, loss landscapes."""
