"""A quiet-hours window: a start and an end on the wall clock of a time zone.

The user is in quiet hours while **the clock of their zone shows a time in the window**:
``start <= clock < end``, or, for a window that crosses midnight (``start > end``, e.g. 22:00 to
07:00), ``clock >= start or clock < end``. ``start == end`` is refused (all day or never is not
a window).

The end of a stretch of quiet hours is **the first instant after which the clock shows a time
outside the window**, computed in the zone, so daylight saving time is handled as the clock
does it:

* a night the clocks go forward is an hour shorter: 22:00 to 07:00 lasts eight hours;
* an end the clock skips (02:30 on a night the clock jumps from 02:00 to 03:00) ends quiet hours
  at the jump (03:00 on the clock);
* an end the clock shows twice (02:30 on a night the clock goes back from 03:00 to 02:00) ends
  them the first time; the clock then shows quiet hours again (02:00 to 02:30 a second time),
  and what arrives then is held until the second 02:30.

Times are ``HH:MM`` (24-hour), or ``HH:MM:SS`` where a window must end on a given second (tests,
demos); zones are IANA names (``Europe/Berlin``), read with :mod:`zoneinfo` from the system's
time-zone database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})
"""Files of the database that are not IANA zones (``localtime`` is the host's own)."""
_STEP = timedelta(hours=3)
"""Offsets are sampled this often between two instants: no zone changes its clock twice (and
back) within three hours."""


@cache
def known_zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


def parse_time(text: str) -> time:
    """``HH:MM`` or ``HH:MM:SS`` (24-hour, two digits each) as a time; ValueError for anything
    else."""
    match = _CLOCK.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("must be a time as HH:MM (00:00 to 23:59), or HH:MM:SS")
    return time(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


def show_time(clock: time) -> str:
    """``HH:MM``, or ``HH:MM:SS`` if it has seconds: what :func:`parse_time` reads back."""
    return clock.strftime("%H:%M:%S" if clock.second else "%H:%M")


def parse_zone(text: str) -> ZoneInfo:
    """An IANA time-zone name as a zone; ValueError for anything else."""
    if not isinstance(text, str) or text not in known_zones():
        raise ValueError("must be an IANA time zone name such as Europe/Berlin")
    return ZoneInfo(text)


@dataclass(frozen=True)
class QuietWindow:
    start: time
    end: time
    zone: ZoneInfo

    @classmethod
    def parse(cls, start: str, end: str, time_zone: str) -> QuietWindow:
        """The window of three texts as the API takes them; ValueError naming what is wrong."""
        window = cls(parse_time(start), parse_time(end), parse_zone(time_zone))
        if window.start == window.end:
            raise ValueError("start and end must differ")
        return window

    @property
    def time_zone(self) -> str:
        return self.zone.key

    def show(self) -> tuple[str, str, str]:
        return show_time(self.start), show_time(self.end), self.time_zone

    def covers(self, clock: time) -> bool:
        """Whether a time shown by the zone's clock is in the window."""
        if self.start < self.end:
            return self.start <= clock < self.end
        return clock >= self.start or clock < self.end

    def contains(self, at: datetime) -> bool:
        """Whether ``at`` (aware; naive is taken as UTC) is in quiet hours."""
        return self.covers(_wall(at, self.zone).time())

    def until(self, at: datetime) -> datetime | None:
        """When the quiet hours ``at`` is in end (aware UTC), or None if it is in none."""
        at = _utc(at)
        if not self.contains(at):
            return None
        moment = at
        for _ in range(16):  # each turn ends at the exit or at one change of the clock
            wall = _wall(moment, self.zone)
            target = datetime.combine(wall.date(), self.end)
            if target <= wall:
                target += timedelta(days=1)
            leaves = moment + (target - wall)  # if the clock keeps its offset until then
            change = _first_change(moment, leaves, self.zone)
            if change is None:
                return leaves
            if not self.contains(change):  # the clock jumped out of the window
                return change
            moment = change  # it jumped, but stays inside: go on from there
        raise AssertionError("the clock of a zone changed more often than in any known zone")


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _wall(at: datetime, zone: ZoneInfo) -> datetime:
    """What the zone's clock shows at ``at``, as a naive datetime."""
    return _utc(at).astimezone(zone).replace(tzinfo=None)


def _offset(at: datetime, zone: ZoneInfo) -> timedelta | None:
    return at.astimezone(zone).utcoffset()


def _first_change(begin: datetime, end: datetime, zone: ZoneInfo) -> datetime | None:
    """The first instant in ``(begin, end]`` at which the zone's UTC offset differs from the
    one at ``begin`` (to the second: zones change their clocks on whole seconds), or None."""
    offset = _offset(begin, zone)
    low = begin
    probe = begin
    while probe < end:
        probe = min(probe + _STEP, end)
        if _offset(probe, zone) != offset:
            break
        low = probe
    else:
        return None
    # the change lies in (low, probe]: bisect over whole seconds
    lo = int(low.timestamp() // 1)  # the offset at lo is still ``offset`` (changes are whole)
    hi = int(-(-probe.timestamp() // 1))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(datetime.fromtimestamp(mid, UTC), zone) == offset:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)
