//! Keep-warm windows: days and hours, in a time zone, during which an idle VM is not stopped (office hours),
//! and optionally started at the window's start so that the day's first login finds it up. Parsed from
//! `keep_warm = ["Mon-Fri 08:00-18:00 Europe/Berlin"]`; the calendar arithmetic is jiff's.

use std::fmt;

use anyhow::{Context, Result, bail};
use jiff::{
    Timestamp,
    civil::{Date, Time, Weekday},
    tz::TimeZone,
};

use super::state::Millis;

/// How far ahead windows are followed: a week, after which every window has repeated.
const LOOK_AHEAD: Millis = 7 * 24 * 60 * 60 * 1000;

/// Days a window repeats, in the order Monday to Sunday.
const DAYS: [(Weekday, &str); 7] = [
    (Weekday::Monday, "Mon"),
    (Weekday::Tuesday, "Tue"),
    (Weekday::Wednesday, "Wed"),
    (Weekday::Thursday, "Thu"),
    (Weekday::Friday, "Fri"),
    (Weekday::Saturday, "Sat"),
    (Weekday::Sunday, "Sun"),
];

/// One window: on each of its days, from `start` to `end` in `tz` (into the next day when `end` is not after
/// `start`).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    days: [bool; 7],
    start: Time,
    end: Time,
    tz: TimeZone,
    /// As the operator wrote it, for `check-config` and `status`.
    text: String,
}

/// A profile's windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Windows(Vec<Window>);

impl Windows {
    pub fn parse(specs: &[String]) -> Result<Windows> {
        specs
            .iter()
            .map(|spec| Window::parse(spec).with_context(|| format!("keep_warm {spec:?}")))
            .collect::<Result<_>>()
            .map(Windows)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// If `now` is inside a window: when that window (or one overlapping it) ends, looking at most a week
    /// ahead (windows that cover every day would go on forever).
    pub fn covering(&self, now: Millis) -> Option<Millis> {
        let horizon = now + LOOK_AHEAD;
        let mut end = None;
        let mut at = now;
        // Windows that overlap or abut extend each other.
        while let Some(next) = self.0.iter().filter_map(|w| w.covering(at)).max() {
            if end.is_some_and(|e| next <= e) {
                break;
            }
            if next >= horizon {
                return Some(horizon);
            }
            end = Some(next);
            at = next;
        }
        end
    }

    /// When the next window starts after `now` (within a week), and which one.
    pub fn next_start(&self, now: Millis) -> Option<(Millis, &Window)> {
        self.0
            .iter()
            .filter_map(|w| Some((w.next_start(now)?, w)))
            .min_by_key(|(at, _)| *at)
    }

    /// If `now` is inside a window: when it started.
    pub fn started(&self, now: Millis) -> Option<Millis> {
        self.0
            .iter()
            .filter_map(|w| w.span_at(now))
            .map(|(s, _)| s)
            .min()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Window> {
        self.0.iter()
    }
}

impl Window {
    /// `DAYS HH:MM-HH:MM [TIME ZONE]`: days as `Mon-Fri`, `Mon,Wed,Fri`, `Sat` or `daily`; the system's time
    /// zone when none is named.
    pub fn parse(spec: &str) -> Result<Window> {
        let parts: Vec<&str> = spec.split_whitespace().collect();
        let (days, hours, tz) = match parts.as_slice() {
            [days, hours] => (*days, *hours, TimeZone::system()),
            [days, hours, tz] => (
                *days,
                *hours,
                TimeZone::get(tz)
                    .with_context(|| format!("{tz:?} is not a time zone such as Europe/Berlin"))?,
            ),
            _ => bail!(
                "expected DAYS HH:MM-HH:MM [TIME ZONE], e.g. \"Mon-Fri 08:00-18:00 Europe/Berlin\""
            ),
        };
        let (start, end) = hours
            .split_once('-')
            .with_context(|| format!("{hours:?} is not HH:MM-HH:MM"))?;
        // An end at or before the start is on the next day: 22:00-06:00 spans the night, 00:00-24:00 a day.
        let (start, end) = (time(start)?, time(end)?);
        Ok(Window {
            days: parse_days(days)?,
            start,
            end,
            tz,
            text: spec.to_owned(),
        })
    }

    /// The end of this window if `now` is inside it.
    fn covering(&self, now: Millis) -> Option<Millis> {
        self.span_at(now).map(|(_, end)| end)
    }

    /// The occurrence of this window around `now`, if `now` is inside one.
    fn span_at(&self, now: Millis) -> Option<(Millis, Millis)> {
        let today = Timestamp::from_millisecond(now as i64)
            .ok()?
            .to_zoned(self.tz.clone())
            .date();
        // An occurrence that began yesterday may run past midnight.
        [today.yesterday().ok()?, today]
            .into_iter()
            .filter_map(|day| self.occurrence(day))
            .find(|(start, end)| *start <= now && now < *end)
    }

    fn next_start(&self, now: Millis) -> Option<Millis> {
        let mut day = Timestamp::from_millisecond(now as i64)
            .ok()?
            .to_zoned(self.tz.clone())
            .date();
        for _ in 0..8 {
            if let Some((start, _)) = self.occurrence(day)
                && start > now
            {
                return Some(start);
            }
            day = day.tomorrow().ok()?;
        }
        None
    }

    /// The occurrence that starts on `day`, as epoch milliseconds, if the window repeats on that day.
    fn occurrence(&self, day: Date) -> Option<(Millis, Millis)> {
        let index = day.weekday().to_monday_zero_offset() as usize;
        if !self.days[index] {
            return None;
        }
        let end_day = if self.end <= self.start {
            day.tomorrow().ok()?
        } else {
            day
        };
        let start = day.to_datetime(self.start).to_zoned(self.tz.clone()).ok()?;
        let end = end_day
            .to_datetime(self.end)
            .to_zoned(self.tz.clone())
            .ok()?;
        Some((millis(start.timestamp())?, millis(end.timestamp())?))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn millis(at: Timestamp) -> Option<Millis> {
    u64::try_from(at.as_millisecond()).ok()
}

/// `08:00`; `24:00` for the end of the day.
fn time(text: &str) -> Result<Time> {
    if text == "24:00" {
        return Ok(Time::midnight());
    }
    let (h, m) = text
        .split_once(':')
        .with_context(|| format!("{text:?} is not HH:MM"))?;
    let (h, m): (i8, i8) = (
        h.parse()
            .with_context(|| format!("{text:?} is not HH:MM"))?,
        m.parse()
            .with_context(|| format!("{text:?} is not HH:MM"))?,
    );
    Time::new(h, m, 0, 0).with_context(|| format!("{text:?} is not a time of day"))
}

fn parse_days(text: &str) -> Result<[bool; 7]> {
    let mut days = [false; 7];
    if matches!(text, "daily" | "*") {
        return Ok([true; 7]);
    }
    let index = |name: &str| {
        DAYS.iter()
            .position(|(_, short)| short.eq_ignore_ascii_case(name))
            .with_context(|| format!("{name:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
    };
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (index(from)?, index(to)?);
                let mut day = from;
                loop {
                    days[day] = true;
                    if day == to {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days[index(part)?] = true,
        }
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Epoch milliseconds of a civil time in `tz`.
    fn at(tz: &str, text: &str) -> Millis {
        let dt: jiff::civil::DateTime = text.parse().unwrap();
        millis(dt.in_tz(tz).unwrap().timestamp()).unwrap()
    }

    fn windows(specs: &[&str]) -> Windows {
        Windows::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn office_hours_cover_weekdays_only() {
        let office = windows(&["Mon-Fri 08:00-18:00 Europe/Berlin"]);
        // Monday 2026-12-07.
        let berlin = "Europe/Berlin";
        assert_eq!(office.covering(at(berlin, "2026-12-07T07:59")), None);
        assert_eq!(
            office.covering(at(berlin, "2026-12-07T08:00")),
            Some(at(berlin, "2026-12-07T18:00"))
        );
        assert_eq!(office.covering(at(berlin, "2026-12-07T18:00")), None);
        assert_eq!(
            office.covering(at(berlin, "2026-12-12T10:00")),
            None,
            "Saturday"
        );
        assert_eq!(
            office
                .next_start(at(berlin, "2026-12-11T19:00"))
                .map(|(t, _)| t),
            Some(at(berlin, "2026-12-14T08:00")),
            "Friday evening: Monday morning"
        );
    }

    #[test]
    fn a_window_may_run_past_midnight_and_windows_that_touch_join() {
        let night = windows(&["Fri 22:00-02:00 UTC"]);
        assert_eq!(
            night.covering(at("UTC", "2026-12-12T01:00")),
            Some(at("UTC", "2026-12-12T02:00")),
            "Saturday 01:00 is still Friday's window"
        );
        let all_day = windows(&["daily 00:00-24:00 UTC"]);
        assert_eq!(
            all_day.covering(at("UTC", "2026-12-07T23:59")),
            Some(at("UTC", "2026-12-14T23:59")),
            "every day, every hour: kept a week ahead, then looked at again"
        );
        let joined = windows(&["daily 08:00-12:00 UTC", "daily 12:00-14:00 UTC"]);
        assert_eq!(
            joined.covering(at("UTC", "2026-12-07T09:00")),
            Some(at("UTC", "2026-12-07T14:00"))
        );
    }

    #[test]
    fn daylight_saving_time_is_the_time_zone_database_s() {
        // Europe/Berlin leaves summer time on 2026-10-25: 08:00 is 07:00 UTC, not 06:00.
        let office = windows(&["Sun 08:00-09:00 Europe/Berlin"]);
        assert!(office.covering(at("UTC", "2026-10-25T07:30")).is_some());
        assert!(office.covering(at("UTC", "2026-10-25T06:30")).is_none());
    }

    #[test]
    fn mistakes_are_named() {
        for (spec, says) in [
            ("Mon-Fri 8-18 UTC", "HH:MM"),
            ("Someday 08:00-18:00 UTC", "not a day"),
            ("Mon 08:00-18:00 Mars/Olympus", "not a time zone"),
            ("08:00-18:00", "expected DAYS"),
        ] {
            let error = format!("{:#}", Window::parse(spec).unwrap_err());
            assert!(error.contains(says), "{spec}: {error}");
        }
    }
}
