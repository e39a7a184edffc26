//! Masking of contacts and tokens, so that logs and traces never carry them whole.

/// Masks a phone number, e-mail address or push token: `+86 138****5678`,
/// `li***@example.com`, `fcm:ab…yz`.
pub fn mask_contact(contact: &str) -> String {
    if let Some((local, domain)) = contact.split_once('@') {
        let keep: String = local.chars().take(2).collect();
        return format!("{keep}***@{domain}");
    }
    let digits = contact.chars().filter(|c| c.is_ascii_digit()).count();
    let phone_like = contact.chars().all(|c| c.is_ascii_digit() || "+ -()".contains(c));
    if phone_like && digits >= 7 {
        // Keep the country code (when written), the first 3 and last 4 digits.
        let (prefix, rest) = match contact.split_once(' ') {
            Some((cc, rest)) if cc.starts_with('+') => (format!("{cc} "), rest),
            _ => (String::new(), contact),
        };
        let rest: Vec<char> = rest.chars().filter(|c| c.is_ascii_digit()).collect();
        if rest.len() >= 8 {
            let head: String = rest[..3].iter().collect();
            let tail: String = rest[rest.len() - 4..].iter().collect();
            return format!("{prefix}{head}****{tail}");
        }
        let tail: String = rest[rest.len().saturating_sub(2)..].iter().collect();
        return format!("{prefix}****{tail}");
    }
    mask_token(contact)
}

/// Masks an opaque token, keeping only enough to tell two apart: `tok_…4242`.
pub fn mask_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() <= 6 {
        return "****".to_string();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    let head: String = chars.iter().take_while(|c| **c != '_').take(4).collect();
    if head.len() < chars.len() - 4 && chars.get(head.len()) == Some(&'_') {
        format!("{head}_…{tail}")
    } else {
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_phones_emails_and_tokens() {
        assert_eq!(mask_contact("+86 13812345678"), "+86 138****5678");
        assert_eq!(mask_contact("13812345678"), "138****5678");
        assert_eq!(mask_contact("li.wei@example.com"), "li***@example.com");
        assert_eq!(mask_token("tok_visa_approve_4242"), "tok_…4242");
        assert_eq!(mask_token("abc"), "****");
        assert!(!mask_contact("fcm-device-token-abcdef").contains("device"));
    }
}
