use describe::Describe;

/// What the demo prints, described by the proc-macro.
#[derive(Describe)]
#[allow(dead_code)]
struct Report {
    greeting: String,
    total: String,
}

fn main() {
    let text = format!("{} from envconf {}", envconf::greeting(), envconf::VERSION);
    println!("{}", leaf::label(&text));
    println!("squares total {}", generated::total());
    println!("fingerprint {} ({} spaces)", leaf::fingerprint(&text), leaf::count(&text, b' '));
    println!("{}", Report::describe());
    println!("native answer {}", native::answer());
}
