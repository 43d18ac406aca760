//! The rest of a NAR whose body broke off: asked of the upstream itself (never its site: a
//! site that died mid-body is why we are here), from the first byte not yet received. Only a
//! 206 whose range starts there is taken; anything else means the download cannot go on.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use url::Url;

use super::{Credential, SendError, Upstream, HEADER_TIMEOUT};
use crate::http::display_url;

impl Upstream {
    /// `url`'s bytes from `offset` on, straight from the upstream with this machine's token.
    pub async fn fetch_rest(
        &self,
        url: &Url,
        offset: u64,
    ) -> Result<Response<Incoming>, SendError> {
        self.check_target(url)?;
        let mut credential = Credential::of(self.identity.as_ref(), &self.auth);
        let header = credential.header().await?;
        let mut request = Request::builder()
            .uri(url.as_str())
            .header(http::header::USER_AGENT, crate::http::USER_AGENT)
            .header(http::header::RANGE, format!("bytes={offset}-"));
        if let (true, Some(value)) = (url.origin() == self.base.origin(), header) {
            request = request.header(http::header::AUTHORIZATION, value);
        }
        let request = request.body(Full::new(Bytes::new()))?;
        let response = tokio::time::timeout(HEADER_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| SendError::NoAnswer {
                url: display_url(url),
                secs: HEADER_TIMEOUT.as_secs(),
            })?
            .map_err(|e| SendError::Failed {
                url: display_url(url),
                detail: super::error_chain(&e),
            })?;
        let starts_there = response
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|start| start.parse::<u64>().ok())
            == Some(offset);
        if response.status() != StatusCode::PARTIAL_CONTENT || !starts_there {
            return Err(SendError::NoRange {
                url: display_url(url),
                offset,
                status: response.status().as_u16(),
            });
        }
        Ok(response)
    }
}
