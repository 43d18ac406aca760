//! The rest of a NAR whose body broke off: asked of the upstream itself (never its site: a
//! site that died mid-body is why we are here), from the first byte not yet received. Only a
//! 206 whose range starts there is taken; anything else means the download cannot go on.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use url::Url;

use super::{Credential, Outgoing, SendError, Unanswered, Upstream, HEADER_TIMEOUT};
use crate::http::display_url;

impl Upstream {
    /// `url`'s bytes from `offset` on, straight from the upstream with this machine's token.
    pub async fn fetch_rest(
        &self,
        url: &Url,
        offset: u64,
    ) -> Result<Response<Incoming>, Unanswered> {
        let mut credential = Credential::of(self.identity.as_ref(), &self.auth);
        let empty = || Full::new(Bytes::new());
        let range = [(http::header::RANGE, format!("bytes={offset}-"))];
        let out = Outgoing {
            method: Method::GET,
            url,
            headers: &range,
            body: &empty,
            credential_for: self.base.origin(),
            timeout: Some(HEADER_TIMEOUT),
            via_site: false,
        };
        let response = self.send(&self.client, &mut credential, &out).await?;
        let starts_there = response
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|start| start.parse::<u64>().ok())
            == Some(offset);
        if response.status() != StatusCode::PARTIAL_CONTENT || !starts_there {
            return Err(Unanswered::Transport(SendError::NoRange {
                url: display_url(url),
                offset,
                status: response.status().as_u16(),
            }));
        }
        Ok(response)
    }
}
