"""Lego-MT training (localized, two stages), flow detaching, translation and evaluation."""
