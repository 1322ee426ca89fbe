fn main() {
    let text = format!("{} from envconf {}", envconf::greeting(), envconf::VERSION);
    println!("{}", leaf::label(&text));
    println!("squares total {}", generated::total());
    println!("fingerprint {} ({} spaces)", leaf::fingerprint(&text), leaf::count(&text, b' '));
}
