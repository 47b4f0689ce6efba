//! The stocksync server binary: parse flags and environment, then run.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--version" || arg == "-V") {
        print!("{}", stocksync::cli::version());
        return;
    }
    let settings = match stocksync::cli::Settings::parse(&args, |k| std::env::var(k).ok()) {
        Ok(Some(settings)) => settings,
        Ok(None) => {
            print!("{}", stocksync::cli::usage());
            return;
        }
        Err(e) => {
            eprintln!("stocksync: {e}");
            std::process::exit(2);
        }
    };
    let result = if settings.workers > 1 {
        stocksync::server::start::supervise(settings, &args)
    } else {
        stocksync::server::start::run(settings)
    };
    if let Err(e) = result {
        eprintln!("stocksync: {e}");
        std::process::exit(1);
    }
}
