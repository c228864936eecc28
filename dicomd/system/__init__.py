"""Operating-system glue: sd_notify, socket activation, privilege drop, journald."""
