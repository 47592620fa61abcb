"""Grad-CAM activation maps of trained models, laid out like the paper's Figure 1 (``python -m orchestrator.gradcam``)."""
