"""Evaluation of model versions: distances, controllability, anatomy adherence, memorisation, downstream gains."""
