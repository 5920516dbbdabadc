"""Using a trained model: prediction, attention maps and explanations, export."""
