"""User registration across three services, with steps outside any database.

``intake`` (Python) checks a submission and orchestrates the ``registration``
saga (:mod:`.intake`, :mod:`.saga`); ``identity`` (a legacy service: SQL and
two TOML files, :mod:`.identity`) creates the user at an identity provider
through an effect, and deletes it as the compensation; ``notifier`` (Python,
:mod:`.notifier`) sends the welcome e-mail, the saga's pivot, through an
effect. :mod:`.provider` and :mod:`.mailserver` are the outside world: a
small identity provider with faults on demand, and a real SMTP server. See
docs/external-effects.md.
"""

from participants.examples.registration import identity, intake, notifier, saga
from participants.examples.registration.saga import REGISTRATION, registration_saga

__all__ = ["REGISTRATION", "identity", "intake", "notifier", "registration_saga", "saga"]
