"""Pure array functions for detection: resizing, box geometry, NMS. No I/O, no state."""
