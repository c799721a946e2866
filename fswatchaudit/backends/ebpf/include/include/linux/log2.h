/* Intentionally empty: bcc includes it, nothing here needs it. */
