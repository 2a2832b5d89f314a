//! The timeline page for support staff (`GET /ui/users/{user_id}`): plain server-rendered HTML,
//! no script and no front-end build step.
//!
//! Everything stored is user-controlled content (attribute values above all), so every piece of
//! text goes through [`escape`] before it reaches the page, in element content and in attribute
//! values alike; and the page is served with a Content-Security-Policy that allows no script at
//! all, a second line should an escape ever be missed.

use std::fmt::Write as _;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};

use crate::api::params::{encode, EventsQuery, MAX_TYPES};
use crate::store::read::StoredEvent;

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.3em .5em;\
text-align:left;vertical-align:top;font-size:.9em}th{background:#f4f4f4}\
td.attrs{font-family:monospace;white-space:pre-wrap;word-break:break-all}\
form{margin:1em 0}input{margin-right:.8em}nav a{margin-right:1.5em}.muted{color:#777}";

fn shell(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n",
        escape(title)
    )
}

/// The response headers of every page: no script may run, nothing is cached or sent on as a
/// referrer (page tokens are in the URL).
pub fn html_response(status: StatusCode, page: String) -> Response<Body> {
    let mut r = Response::new(Body::from(page));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A page saying what went wrong.
pub fn error_page(status: StatusCode, message: &str) -> String {
    shell(
        &format!("vault: {status}"),
        &format!(
            "<h1>{}</h1>\n<p id=\"error\">{}</p>",
            escape(&status.to_string()),
            escape(message)
        ),
    )
}

/// The timeline of one page of a user's events.
pub fn timeline(
    user_id: &str,
    q: &EventsQuery,
    events: &[StoredEvent],
    next_token: Option<&str>,
) -> String {
    let base = format!("/ui/users/{}", encode(user_id));
    let mut body = format!(
        "<h1>Activity of <code id=\"user\">{}</code></h1>\n",
        escape(user_id)
    );
    let value = |v: &Option<String>| escape(v.as_deref().unwrap_or(""));
    // A field for each type filtered on (the next page keeps them all) and an empty one for
    // another, while another may be added; empty fields are left out when the form is sent.
    let mut types = String::new();
    let empty = (q.types.len() < MAX_TYPES).then_some("");
    for t in q.types.iter().map(String::as_str).chain(empty) {
        let _ = write!(
            types,
            "<label>Type <input name=\"type\" value=\"{}\" placeholder=\"any\"></label>",
            escape(t)
        );
    }
    let _ = writeln!(
        body,
        "<form method=\"get\" action=\"{base}\">\
         <label>Since <input name=\"since\" value=\"{}\" placeholder=\"7d or 2025-11-24T00:00:00Z\"></label>\
         <label>Until <input name=\"until\" value=\"{}\" placeholder=\"now\"></label>\
         {types}\
         <label>Per page <input name=\"limit\" value=\"{}\" size=\"5\"></label>\
         <button type=\"submit\">Show</button></form>",
        value(&q.since),
        value(&q.until),
        q.limit,
    );
    if events.is_empty() {
        body.push_str("<p id=\"empty\" class=\"muted\">No events match.</p>\n");
    } else {
        let _ = writeln!(
            body,
            "<p class=\"muted\"><span id=\"count\">{}</span> event(s), newest first.</p>",
            events.len()
        );
        body.push_str(
            "<table id=\"events\"><thead><tr><th>Occurred at (UTC)</th><th>Type</th>\
             <th>Attributes</th><th>Event id</th><th>Source</th></tr></thead><tbody>\n",
        );
        for e in events {
            let _ = writeln!(
                body,
                "<tr class=\"event\"><td class=\"at\">{}</td><td class=\"type\">{}</td>\
                 <td class=\"attrs\">{}</td><td class=\"id\">{}</td><td class=\"source\">{}</td></tr>",
                escape(&crate::api::rfc3339(e.occurred_at_ms)),
                escape(&e.event_type),
                escape(e.attributes.as_deref().unwrap_or("")),
                e.event_id,
                escape(&format!(
                    "{}/{}@{}",
                    e.source_topic, e.source_partition, e.source_offset
                )),
            );
        }
        body.push_str("</tbody></table>\n");
    }
    body.push_str("<nav>");
    if q.page_token.is_some() {
        let _ = write!(
            body,
            "<a id=\"first-page\" href=\"{}\">First page</a>",
            escape(&format!("{base}?{}", q.query_string()))
        );
    }
    if let Some(t) = next_token {
        let _ = write!(
            body,
            "<a id=\"next-page\" href=\"{}\">Next page</a>",
            escape(&format!(
                "{base}?{}&page_token={}",
                q.query_string(),
                encode(t)
            ))
        );
    } else if !events.is_empty() {
        body.push_str("<span id=\"end\" class=\"muted\">No more events.</span>");
    }
    body.push_str("</nav>");
    shell(&format!("vault: {user_id}"), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_content_cannot_become_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        let key = crate::api::token::PageKey::from_config(&crate::config::ApiConfig::default());
        let q = EventsQuery::parse(
            &[("type".into(), "\"><script>x</script>".into())],
            "u<b>",
            &key,
            0,
            10,
            100,
            false,
        )
        .unwrap();
        let e = StoredEvent {
            event_id: uuid::Uuid::nil(),
            event_type: "<img src=x onerror=alert(1)>".into(),
            occurred_at_ms: 0,
            attributes: Some(r#"{"note":"<script>alert(1)</script>"}"#.into()),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 1,
        };
        let page = timeline("u<b>", &q, &[e], Some("tok"));
        assert!(
            !page.contains("<script>") && !page.contains("<img") && !page.contains("<b>"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("href=\"/ui/users/u%3Cb%3E?type=%22%3E%3Cscript%3Ex%3C%2Fscript%3E&amp;limit=10&amp;page_token=tok\""), "{page}");
    }

    #[test]
    fn the_form_keeps_every_type_filtered_on_and_offers_one_more() {
        let key = crate::api::token::PageKey::from_config(&crate::config::ApiConfig::default());
        let query = |types: &[&str]| {
            let pairs: Vec<(String, String)> = types
                .iter()
                .map(|t| ("type".to_string(), t.to_string()))
                .collect();
            EventsQuery::parse(&pairs, "u", &key, 0, 10, 100, false).unwrap()
        };
        let fields = |page: &str| -> Vec<String> {
            page.split("<input name=\"type\" value=\"")
                .skip(1)
                .map(|rest| rest[..rest.find('"').unwrap()].to_owned())
                .collect()
        };
        let page = timeline("u", &query(&[]), &[], None);
        assert_eq!(fields(&page), [""]);
        let page = timeline("u", &query(&["click", "view", "buy"]), &[], None);
        assert_eq!(fields(&page), ["click", "view", "buy", ""]);
        let all: Vec<String> = (0..MAX_TYPES).map(|i| format!("t{i}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let page = timeline("u", &query(&all), &[], None);
        assert_eq!(fields(&page), all, "no empty field past the most types");
    }
}
