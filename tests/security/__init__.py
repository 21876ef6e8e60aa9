"""Security tests (issue 7): fuzzing, exposure, nothing sensitive stored, stored XSS."""
