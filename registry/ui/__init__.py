"""The operator dashboard (issue 17): static pages served under /ui/ and browser sessions."""
