"""The API dialects: each module only translates its requests into jobs and results into its
responses; all of them end in the same Batcher.submit."""
