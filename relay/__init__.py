"""walsaga's outbox side: the capture layer that fills ``walsaga.outbox``
(``walsaga deploy``) and the relay that tails each source's transaction log and
publishes every event to Kafka (``walsaga relay``). Uses the :mod:`walsaga`
kernel; never imports :mod:`participants`."""
