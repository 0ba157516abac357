"""Example services from the classic saga descriptions, built on the runtime:
order + customer (credit), and travel booking (flight, hotel, car)."""
