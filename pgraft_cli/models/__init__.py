"""Model objects: the loaded model in pgraft's time convention, the noise corrector, the LoRA adapter and
the small bundled networks. Imports only core."""
