"""How training runs: the device and its precision, seeding, optimizer and schedule, the hot loop."""
