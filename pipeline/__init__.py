"""edgesmith's pipeline: recipe → model → stages → ONNX export (parity gate) → per-target compile → benchmark."""
