"""What a fit is shown as: ArviZ ``InferenceData``, comparison tables, reports and plots."""
