"""minivl's test suite (a package, so one test module can import another's helpers as tests.<module>)."""
