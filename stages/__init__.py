"""The stages of the DeepSeek-R1 recipe, one module each, plus the pieces they share. No Prefect in here."""
